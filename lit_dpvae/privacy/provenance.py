"""Where a model's weights came from: the privacy they already spent (docs/privacy.md §4,
*Resumes and warm starts*). Pure torch, no Lightning.

``SPENT_WEIGHTS`` maps SHA-256 fingerprints of weights this process trained or checkpointed
(the whole set of parameters, and each parameter tensor the run changed) to the accountant
state of the run that produced them; ``merge_histories`` composes two accountant histories past
their common prefix.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lit_dpvae.privacy.accounting import PrivacyAccountant

#: Weights this process trained or checkpointed, by fingerprint: the privacy they spent. A later
#: fit on a copy of them (``load_state_dict``) continues that history (``warm_start``).
SPENT_WEIGHTS: dict[str, dict[str, Any]] = {}


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's values (names, shapes, dtypes and bytes; frozen ones
    too, so freezing part of a copy does not hide it)."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tensor_fingerprints(module: torch.nn.Module, trainable_only: bool) -> list[str]:
    """One SHA-256 per parameter (shape, dtype and bytes, not the name: a partial copy into
    another architecture keeps them); constant tensors (fresh zeros or ones) are skipped."""
    out = []
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.detach().cpu().contiguous()
        if t.numel() < 2 or bool((t == t.reshape(-1)[0]).all()):
            continue
        digest = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
        out.append(digest.hexdigest())
    return out


def run_length(history: list[tuple[float, float, int]]) -> list[list[Any]]:
    merged: list[list[Any]] = []
    for sigma, q, steps in history:
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1][2] += int(steps)
        else:
            merged.append([sigma, q, int(steps)])
    return merged


def merge_histories(ours: list, theirs: list) -> list[tuple[float, float, int]]:
    """Our history followed by what ``theirs`` has beyond the longest common prefix of both
    (the steps the weights took elsewhere since they left this run), run-length encoded."""
    a, b = run_length(ours), run_length(theirs)
    i = j = 0
    left_a, left_b = (a[0][2] if a else 0), (b[0][2] if b else 0)
    while i < len(a) and j < len(b) and a[i][:2] == b[j][:2]:
        take = min(left_a, left_b)
        left_a, left_b = left_a - take, left_b - take
        if left_a == 0:
            i += 1
            left_a = a[i][2] if i < len(a) else 0
        if left_b == 0:
            j += 1
            left_b = b[j][2] if j < len(b) else 0
    rest = ([[b[j][0], b[j][1], left_b]] if j < len(b) else []) + b[j + 1:]
    return [(float(s_), float(q_), int(k)) for s_, q_, k in a + [e for e in rest if e[2] > 0]]


def register_spent(module: torch.nn.Module, record: dict[str, Any],
                   skip: tuple[str, set[str]] | None = None) -> None:
    """Remember that ``module``'s current weights carry ``record`` (``{"mechanism",
    "accountant": state_dict}``): their whole fingerprint and each parameter tensor's, except
    those in ``skip`` (the weights a run started from, which it did not produce)."""
    start_whole, start_tensors = skip or ("", set())
    whole = fingerprint(module)
    if whole != start_whole:
        SPENT_WEIGHTS[whole] = record
    for key in tensor_fingerprints(module, trainable_only=False):
        if key not in start_tensors:
            SPENT_WEIGHTS["tensor:" + key] = record


def mark_loaded(module: Any, provenance: dict[str, Any] | None, loaded: bool = True) -> None:
    """Weights loaded from a checkpoint with a privacy state: the module remembers the spend,
    and copies of these weights are recognised too (``register_spent``). ``loaded=False``:
    the weights are about to be loaded (Lightning's ``on_load_checkpoint`` runs *before*
    ``load_state_dict``), so only the module is marked: fingerprinting its current (initial)
    values would make every fresh model of that initialisation look trained."""
    if provenance is None or not isinstance(module, torch.nn.Module):
        return
    module._lit_dpvae_provenance = combine_provenance(
        getattr(module, "_lit_dpvae_provenance", None), provenance)
    accountant = provenance["accountant"]
    if loaded and accountant.steps:
        register_spent(module, {"mechanism": provenance.get("mechanism"),
                                "accountant": accountant.state_dict()})


def _identity(provenance: dict[str, Any]) -> str:
    """A name for one loaded spend (its mechanism and accountant state), so loading the same
    checkpoint again, or the two hooks of one load, do not count it twice."""
    accountant = provenance["accountant"]
    text = repr((provenance.get("mechanism"), accountant.state_dict()))
    return hashlib.sha256(text.encode()).hexdigest()


def combine_provenance(existing: dict[str, Any] | None,
                       loaded: dict[str, Any]) -> dict[str, Any]:
    """The spend of a module that carried ``existing`` and had ``loaded``'s weights loaded into
    it: both histories composed (a partial or non-strict load keeps some of the old weights; a
    full one makes the old spend redundant, never unsafe); the same loaded spend is counted
    once. Weights trained without privacy on either side make the result non-private. Two
    different accountants cannot be composed in one: the result is marked ``"mixed"`` and a
    later private fit refuses it (``PrivacyBudget.carry``)."""
    ident = _identity(loaded)
    if existing is None or existing.get("accountant") is None:
        return {**loaded, "loaded": {ident}}
    if ident in existing.get("loaded", set()) or existing["accountant"] is loaded["accountant"]:
        return existing
    old, new = existing["accountant"], loaded["accountant"]
    names = {existing.get("mechanism"), loaded.get("mechanism")}
    non_private = "nonprivate" in names or old.non_private_steps or new.non_private_steps
    state = new.state_dict()
    state["non_private_steps"] = max(old.non_private_steps, new.non_private_steps)
    if old.name == new.name:
        state["history"] = merge_histories(old.history, new.history)
        mechanism = "nonprivate" if non_private else loaded.get("mechanism")
    else:
        mechanism = "nonprivate" if non_private else "mixed"
    return {"mechanism": mechanism, "accountant": PrivacyAccountant.from_state_dict(state),
            "loaded": existing.get("loaded", set()) | {ident}}


def mark_trained(module: Any, mechanism: str, accountant: Any) -> None:
    """``module``'s weights now carry the spend of ``accountant`` (a run in progress): a later
    fit on them, or ``load_from_checkpoint`` of its checkpoints, continues it."""
    if isinstance(module, torch.nn.Module):
        module._lit_dpvae_provenance = {"mechanism": mechanism, "accountant": accountant}


def weights_provenance(module: Any) -> tuple[str | None, Any] | None:
    """``(mechanism, PrivacyAccountant)`` of the privacy ``module``'s weights already spent:
    from the module itself (trained by this library, or loaded from a checkpoint or export with
    a privacy state) or from the fingerprint registry (a whole or partial copy of weights this
    process trained or loaded; parameters from several runs carry every run's spend). None when
    nothing is known."""
    provenance = getattr(module, "_lit_dpvae_provenance", None)
    if provenance and provenance.get("accountant") is not None:
        return provenance.get("mechanism"), provenance["accountant"]
    if not isinstance(module, torch.nn.Module) or not SPENT_WEIGHTS:
        return None
    known = SPENT_WEIGHTS.get(fingerprint(module))
    if known is None:  # a partial copy: any parameter equal to a DP-trained one
        matches = [SPENT_WEIGHTS[k] for k in ("tensor:" + f for f in
                   tensor_fingerprints(module, trainable_only=False)) if k in SPENT_WEIGHTS]
        if not matches:
            return None
        unique = list({id(r): r for r in matches}.values())
        history: list = []
        for r in unique:
            history = merge_histories(history, r["accountant"]["history"])
        state = dict(unique[0]["accountant"], history=history, non_private_steps=max(
            int(r["accountant"].get("non_private_steps", 0)) for r in unique))
        names = {r["mechanism"] for r in unique}
        known = {"mechanism": "nonprivate" if "nonprivate" in names else unique[0]["mechanism"],
                 "accountant": state}
    return known["mechanism"], PrivacyAccountant.from_state_dict(known["accountant"])
