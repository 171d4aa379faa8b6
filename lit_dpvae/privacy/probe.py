"""The record-wise contract probe (docs/privacy.md §1): before the first private step, check
that each declared sample-wise term and pairwise code of a record depends on that record only.

``probe_record_contract(module, batch, n)`` raises ``LossTermsError`` or ``AttributionError``;
``Mechanism.probe_sample_terms`` calls it once per module.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from collections import UserDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_dpvae.privacy.capture import AttributionError, capture_layers
from lit_dpvae.privacy.terms import LossTermsError, batch_terms_of, loss_terms_of


def probe_record_contract(module: nn.Module, batch: Any, n: int, *,
                          collective: bool = False) -> bool:
    """Probe the record-wise contract that every per-record bound rests on (docs/privacy.md
    §1) on one batch of ``n`` records. For each probed record ``i`` (all of them up to 16
    records, else the first, the last and 14 others at random), each declared sample-wise term
    ``ℓ_i`` and each pairwise term's code ``z_i`` (a random combination of its coordinates):

    1. has zero gradient with respect to every *other* record's rows of every floating-point
       tensor of the batch (a term or code that reads other records — a batch mean, codes
       centred on the batch — breaks Theorems 2 and 5);
    2. has zero gradient at every row of every trainable layer's output outside record ``i``'s
       rows (``i·K … i·K+K−1``): rows that no record owns but every record reads —
       data-independent inputs through a trainable layer, e.g. VampPrior pseudo-inputs through
       the encoder — are attributed to records *by position*;
    3. keeps its gradient signature (its value, and the input, output and backprop rows of every
       layer call it reaches; bit for bit on CPU) when another record's data — every tensor,
       NumPy array and list column, labels included — is replaced by a third record's, under the
       same torch/Python/NumPy draws (after a control forward: a model whose randomness the
       global RNGs do not reproduce skips this check with a warning). This catches dependence
       no gradient shows: through labels, detached batch statistics, comparisons;
    4. and ``loss_terms`` writes no parameter or buffer (compared by value; restored before the
       error): a running statistic of the data would be released without noise.

    Refusals: ``LossTermsError`` / ``AttributionError``. RNG-neutral. A probe, not a proof: it
    sees this batch only. ``collective``: a multi-process run, where every rank runs the same
    forwards (they may enter collectives) and a rank with < 2 records only runs them.

    Returns whether the probe was complete: the replacement check (3) needs n ≥ 3 records, so
    a smaller batch is probed again on the next batch (``Mechanism.probe_sample_terms``)."""
    if n < 2 and not collective:
        return False
    states = _module_state(module)
    # the probe must not shift the model's random stream (exact resume relies on it)
    with _same_draws(batch) as same_draws:
        records = _probe_records(n) if n >= 2 else []
        # 1-2: gradients of each probed record's values (inputs made non-leaf clones, so a
        # model may still write them in place; a model that cannot run on inputs that
        # require grad, e.g. one calling .numpy(), gets the layer-row check only).
        _gradient_checks(module, batch, n, records, same_draws)
        # 3: replacement probe. A control forward on the same batch first: where the model's
        # randomness is not reproduced by the global RNG (its own generator, Python's
        # random), records cannot be compared across forwards and the check is skipped.
        # Every rank runs the same forwards (collectives); compared where n ≥ 3.
        same_draws()
        reference = _record_signature(module, batch, n, records)
        same_draws()
        reproducible = _same_signature(reference, _record_signature(module, batch, n,
                                                                      records), None)
        if reproducible is not True and n >= 3:
            warnings.warn(
                "lit_dpvae: loss_terms() is not reproducible under the same torch RNG state "
                "(randomness from its own generator or from Python/NumPy), so the probe "
                "could not check that records do not read each other through labels or "
                "detached statistics; the gradient probe still ran.", stacklevel=3)
        opaque = sorted(opaque_leaves(batch))
        if opaque and n >= 3:
            warnings.warn(
                f"lit_dpvae: the record probe cannot look inside batch items of type "
                f"{', '.join(opaque)}: records they hold are not replaced, so a term that "
                "reads other records through them is not caught, and the sample part is "
                "computed in one unblocked forward, whose rounding can depend on the batch "
                "size (docs/privacy.md §7); pass records as tensors, NumPy arrays or lists of "
                "scalars (in tuples, lists or mappings)", stacklevel=3)
        # Each check: (row i of the changed batch is row src[i]; the records whose data did
        # not change, whose signatures must not move; what changed, for the error).
        checks: list[tuple[list[int], set[int], str]] = []
        for j, first in ((n // 2, False), (0, False), (n - 1, True)):  # one record replaced
            src = list(range(n))
            if n >= 3:
                src[j] = _donor(batch, j, n, first)
            checks.append((src, set(range(n)) - {j}, f"only record {j}'s data changed"))
        # every other record replaced at once, by copies of record r (r = 0 and n − 1): a
        # detached statistic that only the record attaining it moves (a batch
        # max) moves then; (a multi-process rank with < 3 records runs the same forwards)
        for r in ((min(records), max(records)) if records else (0, 0)):
            checks.append(([r] * n, {r}, f"every other record's data was replaced by a copy "
                                         f"of record {r}'s"))
        # half swaps: every even record replaced by its odd neighbour (then the reverse), all
        # unchanged records compared: a statistic that only some records read (gated by a
        # label or a value) and that records r do not read
        odd = [i + 1 if i % 2 == 0 and i + 1 < n else i for i in range(n)]
        even = [i - 1 if i % 2 else i for i in range(n)]
        for src, what in ((odd, "even"), (even, "odd")):
            checks.append((src, {i for i in range(n) if src[i] == i},
                           f"every {what} record's data was replaced by its neighbour's"))
        for src, keep, what in (checks if n >= 3 or collective else ()):
            changed = remap_records(batch, src, n) if n >= 3 else batch
            same_draws()
            signature = _record_signature(module, changed, n, records)
            if n >= 3 and reproducible is True:
                moved = _same_signature(reference, signature, keep)
                if moved is not True:
                    label, i = moved
                    raise LossTermsError(
                        f"{label} of record {i} changed when {what} (every tensor of the "
                        "batch, labels included, under the same random draws): it reads "
                        "other records — through a label, a detached batch statistic or a "
                        "comparison — so per-record clipping does not bound it. Declare it in "
                        "LossTerms.batch (a batch-wise term) instead, or make it read record "
                        "i only. (Random numbers must be drawn in a fixed shape per batch, "
                        "not in a data-dependent count.)"
                    )
    _refuse_state_changes(module, states)
    return n >= 3


def verify_batch_terms(module: nn.Module, batch: Any, n: int) -> str | None:
    """May the model's ``batch_terms`` stand in for ``loss_terms`` in the mechanisms'
    full-batch forward (docs/privacy.md §1 (e))? None when verified on this batch, else the
    reason; the mechanism then keeps ``loss_terms`` (the probed path) for the module.

    On ``batch_terms``' own output: (a) and (b) of the gradient probe on its pairwise codes
    (their autograd graph, which the pairwise part's latent Gram reads, must not reach other
    records' rows), then, in the order training runs it — after a forward of another batch
    (the records reversed), so state a forward leaves behind shows — ``batch_terms(batch)``
    must equal the following ``loss_terms(batch)``' batch-wise and pairwise terms bit for bit
    under the same draws. RNG-neutral; every rank runs the same forwards (collectives), a
    failed check included. A probe, not a proof, like ``probe_record_contract``."""
    states = _module_state(module)
    reason = None
    with _same_draws(batch) as same_draws:
        records = _probe_records(n) if n >= 2 else []
        try:
            _gradient_checks(module, batch, n, records, same_draws, batch_terms_of)
        except (LossTermsError, AttributionError, TypeError) as error:
            reason = str(error)
        same_draws()
        loss_terms_of(module, remap_records(batch, list(range(n))[::-1], n) if n >= 2 else batch)
        same_draws()
        try:
            part = batch_terms_of(module, batch)
        except (LossTermsError, TypeError) as error:
            part, reason = None, reason or str(error)
        same_draws()
        full = loss_terms_of(module, batch)
        if part is not None:
            reason = reason or _batch_terms_difference(full, part)
    _refuse_state_changes(module, states)
    return reason


def _batch_terms_difference(full: Any, part: Any) -> str | None:
    """How ``batch_terms``' output differs from ``loss_terms``' batch-wise and pairwise terms
    (values, codes, prior samples, weights, kernel types, bit for bit), or None."""
    def same(a: Any, b: Any) -> bool:
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype):
            return False
        a, b = a.detach(), b.detach()  # NaN where both have it: validate() names those
        return bool(((a == b) | (a.isnan() & b.isnan())).all())

    if set(full.batch) != set(part.batch) or set(full.pairwise) != set(part.pairwise):
        return (f"it returns terms {sorted(part.batch)} / pairwise {sorted(part.pairwise)}, "
                f"loss_terms {sorted(full.batch)} / {sorted(full.pairwise)}")
    for name in full.batch:
        if not same(full.batch[name], part.batch[name]):
            return f"the value of {name!r} differs from loss_terms'"
    for name, term in full.pairwise.items():
        other = part.pairwise[name]
        if not (same(term.codes, other.codes) and same(term.prior_samples, other.prior_samples)
                and float(term.weight) == float(other.weight)
                and type(term.kernel) is type(other.kernel)):
            return (f"pairwise term {name!r} has other codes, prior samples, weight or kernel "
                    "than loss_terms' (random draws between the codes and the prior samples, "
                    "e.g. decoder dropout, shift them)")
    return None


def _gradient_checks(module: nn.Module, batch: Any, n: int, records: list[int],
                     same_draws: Callable[[], None],
                     terms_of: Callable[[nn.Module, Any], Any] = loss_terms_of) -> None:
    """Checks 1-2 with the batch's inputs made non-leaf clones that require grad (a model may
    still write them in place); a model that cannot run on such inputs (one calling
    ``.numpy()``) gets the layer-row check only."""
    for with_inputs in (True, False):
        probe_batch, inputs = _with_grad_inputs(batch, n) if with_inputs else (batch, [])
        same_draws()
        try:
            _gradient_probe(module, probe_batch, n, inputs, records, terms_of)
            return
        except RuntimeError as error:
            if not with_inputs or isinstance(error, (LossTermsError, AttributionError)):
                raise


def _gradient_probe(module: nn.Module, batch: Any, n: int, inputs: list[Tensor],
                    records: list[int], terms_of: Callable[[nn.Module, Any], Any] = loss_terms_of
                    ) -> None:
    """Checks 1-2 of ``probe_sample_terms`` (one forward of ``terms_of``)."""
    with torch.enable_grad(), capture_layers(module) as cap:
        terms = terms_of(module, batch)
        if n < 2:
            return
        outputs = [c.output for c in cap.calls if c.output.requires_grad]
        for label, values in _probed_values(terms, n):
            if not values.requires_grad:
                continue
            for i in records:
                grads = torch.autograd.grad(values[i], [*inputs, *outputs],
                                            retain_graph=True, allow_unused=True)
                _refuse_cross_record(label, i, n, grads[:len(inputs)], cap.calls,
                                     grads[len(inputs):])


def _moved_rows(grad: Tensor, lo: int, hi: int) -> Tensor:
    """Indices of the rows outside ``[lo, hi)`` where ``grad`` is finite and non-zero
    (non-finite values are left to ``validate()``, which names them properly)."""
    flat = grad.reshape(grad.shape[0], -1)
    moved = ((flat.abs() > 0) & torch.isfinite(flat)).any(1)
    moved[lo:hi] = False
    return moved.nonzero()[:, 0]


def _refuse_cross_record(label: str, i: int, n: int, input_grads: tuple,
                         calls: list, output_grads: tuple) -> None:
    """Raise if record ``i``'s term reads another record's input or reaches a layer row that
    is attributed to another record (``probe_sample_terms``)."""
    for input_grad in input_grads:
        if input_grad is None or input_grad.dim() == 0 or input_grad.shape[0] != n:
            continue
        rows = _moved_rows(input_grad, i, i + 1)
        if rows.numel():
            raise LossTermsError(
                f"{label} of record {i} depends on record {int(rows[0])}: it reads other "
                "records, so per-record clipping does not bound it. Declare it in "
                "LossTerms.batch (a batch-wise term) instead, or make it read record i only."
            )
    outputs = [c for c in calls if c.output.requires_grad]
    for call, grad in zip(outputs, output_grads):
        if grad is None or grad.dim() == 0:
            continue
        rows_total = grad.shape[0]
        if rows_total % n:
            continue  # not record-major at all: the clipper raises AttributionError itself
        k = rows_total // n
        rows = _moved_rows(grad, i * k, (i + 1) * k)
        if rows.numel():
            raise AttributionError(
                f"{label} of record {i} reaches row {int(rows[0])} of a "
                f"{type(call.module).__name__} layer call with {rows_total} rows ({k} per "
                f"record for n={n}), a row attributed to record {int(rows[0]) // k}. Rows that "
                "every record reads (data-independent inputs through a trainable layer, e.g. "
                "VampPrior pseudo-inputs through the encoder) or that mix records cannot be "
                "clipped per record: compute them outside the trainable layers' per-record "
                "calls (e.g. as a batch-wise term), or freeze the parameters they use."
            )


@contextlib.contextmanager
def _same_draws(batch: Any) -> Iterator[Callable[[], None]]:
    """RNG-neutral block whose ``same_draws()`` resets the torch (CPU and the batch's CUDA
    device), Python and NumPy global RNGs to their states at entry: every probe forward then
    starts from the same draws."""
    devices = [t.device for t in _tensors(batch) if t.device.type == "cuda"][:1]
    py_rng, np_rng = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices), _restoring(py_rng, np_rng):
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(devices[0]) if devices else None

        def same_draws() -> None:
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, devices[0])
            random.setstate(py_rng)
            np.random.set_state(np_rng)

        yield same_draws


@contextlib.contextmanager
def _restoring(py_rng: Any, np_rng: Any) -> Iterator[None]:
    """Put Python's and NumPy's global RNG states back afterwards (the probe is RNG-neutral)."""
    try:
        yield
    finally:
        random.setstate(py_rng)
        np.random.set_state(np_rng)


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor (in tuples, lists and dicts, nested)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: _map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        items = [_map_tensors(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []

    def leaf(t: Tensor) -> Tensor:
        found.append(t)
        return t

    _map_tensors(batch, leaf)
    return found


def _with_grad_inputs(batch: Any, n: int) -> tuple[Any, list[Tensor]]:
    """A copy of ``batch`` whose floating-point tensors with ``n`` rows depend on new leaves that
    require gradients (non-leaf clones: the model may still write them in place), and those
    leaves (every such input is probed, not only the first)."""
    inputs: list[Tensor] = []

    def leaf(t: Tensor) -> Tensor:
        if t.is_floating_point() and t.dim() > 0 and t.shape[0] == n:
            source = t.detach().clone().requires_grad_(True)
            inputs.append(source)
            return source.clone()
        return t

    return _map_tensors(batch, leaf), inputs


_LEAVES = (int, float, complex, str, bool, np.generic)


def _is_leaf_column(items: list | tuple, n: int) -> bool:
    """Whether a list/tuple of ``n`` items *inside* the batch (the batch itself is a container
    of columns) is one per-record column, item i record i's: scalars, row tensors of any shapes
    (ragged sequences, some of length n by chance), lists, dicts — unless every item is itself
    ``n`` rows long (a nested container of columns)."""
    if len(items) != n or n == 0:
        return False
    return not all(isinstance(v, (Tensor, np.ndarray)) and v.ndim > 0 and v.shape[0] == n
                   for v in items)


def _rebuild_mapping(batch: Any, items: dict) -> Any:
    """A new mapping of ``batch``'s type holding ``items``, never writing into ``batch``:
    dicts and ``UserDict`` (e.g. transformers' ``BatchEncoding``) are copied with their other
    state (their copies own their storage); any other mapping is built from ``items``."""
    if isinstance(batch, (dict, UserDict)):
        new = copy.copy(batch)
        for key, value in items.items():
            new[key] = value
        return new
    try:
        return type(batch)(items)
    except Exception as error:  # a custom constructor: say what to pass instead
        raise LossTermsError(
            f"the record probe cannot build a batch mapping of type {type(batch).__name__} "
            "from its items: pass the batch as a dict, UserDict, list or tuple") from error


def remap_records(batch: Any, src: list[int], n: int, top: bool = True,
                  paths: set[tuple] | None = None, _path: tuple = ()) -> Any:
    """``batch`` with row ``i`` of every per-record column taken from row ``src[i]``: tensors
    and NumPy arrays with ``n`` rows, and lists/tuples of ``n`` per-record items
    (``_is_leaf_column``), nested in tuples, lists and any mapping (``top``: the batch itself,
    a container of columns). ``paths``: remap only the columns at these positions in the
    batch's structure (``record_columns``), leave every other item as it is."""
    def mine() -> bool:
        return paths is None or _path in paths

    if isinstance(batch, Tensor):
        if batch.dim() > 0 and batch.shape[0] == n and mine():
            return batch[torch.as_tensor(src, device=batch.device)]
        return batch
    if isinstance(batch, np.ndarray):
        return (batch[np.asarray(src)] if batch.ndim > 0 and batch.shape[0] == n and mine()
                else batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: remap_records(v, src, n, False, paths, (*_path, k))
                                        for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if not top and _is_leaf_column(batch, n):
            items = [batch[i] for i in src] if mine() else list(batch)
        else:
            items = [remap_records(v, src, n, False, paths, (*_path, i))
                     for i, v in enumerate(batch)]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def record_columns(batch: Any, n: int, top: bool = True, _path: tuple = ()) -> set[tuple]:
    """The positions (keys and indices from the batch's top) of the items ``remap_records``
    treats as per-record columns of a batch of ``n`` records."""
    if isinstance(batch, (Tensor, np.ndarray)):
        return {_path} if batch.ndim > 0 and batch.shape[0] == n else set()
    if isinstance(batch, Mapping):
        return set().union(*(record_columns(v, n, False, (*_path, k))
                             for k, v in batch.items()))
    if isinstance(batch, (list, tuple)):
        if not top and _is_leaf_column(batch, n):
            return {_path}
        return set().union(*(record_columns(v, n, False, (*_path, i))
                             for i, v in enumerate(batch)))
    return set()


def opaque_leaves(batch: Any) -> set[str]:
    """Type names of the items in ``batch`` that the probe does not open or replace."""
    if batch is None or isinstance(batch, (Tensor, np.ndarray, *_LEAVES)):
        return set()
    if isinstance(batch, Mapping):
        return set().union(*(opaque_leaves(v) for v in batch.values()))
    if isinstance(batch, (list, tuple)):
        return set().union(*(opaque_leaves(v) for v in batch))
    return {type(batch).__name__}


def _donor(batch: Any, j: int, n: int, first: bool) -> int:
    """A record whose data replaces record ``j``'s in the replacement probe: the last (or the
    first) record whose integer columns (labels, ids) differ from ``j``'s, so that label counts
    change too; ``(j + 1) % n`` when all agree."""
    ints: list[Tensor] = []
    _map_tensors(batch, lambda t: ints.append(t) or t if (
        not t.is_floating_point() and t.dim() > 0 and t.shape[0] == n) else t)
    differs = torch.zeros(n, dtype=torch.bool)
    for t in ints:
        flat = t.reshape(n, -1)
        differs |= (flat != flat[j]).any(1).cpu()
    differs[j] = False
    idx = differs.nonzero()[:, 0]
    if idx.numel() == 0:
        return (j + 1) % n
    return int(idx[0] if first else idx[-1])


def _probe_records(n: int) -> list[int]:
    """Every record up to 16; else the first, the last and 14 others drawn at random (the
    probe runs under a forked RNG)."""
    if n <= 16:
        return list(range(n))
    middle = (torch.randperm(n - 2)[:14] + 1).tolist()
    return [0, n - 1, *sorted(middle)]


def _probed_values(terms: Any, n: int) -> list[tuple[str, Tensor]]:
    """``(label, [n] values)`` of the sample-wise terms and of a fixed random combination of
    each pairwise term's code coordinates."""
    checked: list[tuple[str, Tensor]] = []
    sample = terms.sample if isinstance(getattr(terms, "sample", None), dict) else {}
    for name, values in sample.items():
        if isinstance(values, Tensor) and values.dim() == 1 and values.shape[0] == n:
            checked.append((f"sample-wise term {name!r}", values))
    pairwise = terms.pairwise if isinstance(getattr(terms, "pairwise", None), dict) else {}
    for name, term in pairwise.items():
        codes = getattr(term, "codes", None)
        if isinstance(codes, Tensor) and codes.dim() == 2 and codes.shape[0] == n:
            gen = torch.Generator().manual_seed(codes.shape[1])
            mix = torch.randn(codes.shape[1], generator=gen).to(codes)
            checked.append((f"the codes of pairwise term {name!r}", codes @ mix))
    return checked


def _rows(t: Tensor, n: int, records: list[int]) -> Tensor | None:
    """The rows of ``records`` (``K`` rows each when ``t`` has ``n·K`` rows), detached."""
    if t.dim() == 0 or t.shape[0] % n:
        return None
    k = t.shape[0] // n
    idx = torch.tensor([r * k + m for r in records for m in range(k)], device=t.device)
    return t.detach().index_select(0, idx).reshape(len(records), -1)


def _record_signature(module: nn.Module, batch: Any, n: int, records: list[int]) -> dict:
    """What each probed record's released gradient is a function of: its values (sample-wise
    terms, pairwise codes), every layer call's input and output rows, and the backprops of each
    value's sum at those rows. ``{key: [len(records), ...]}``; records are rows."""
    signature: dict[str, Any] = {}
    if n < 2:
        with torch.no_grad():
            loss_terms_of(module, batch)
        return signature
    with torch.enable_grad(), capture_layers(module) as cap:
        checked = _probed_values(loss_terms_of(module, batch), n)
        calls = [c for c in cap.calls if c.output.requires_grad]
        reached: set[int] = set()  # calls whose rows some probed value's gradient goes through
        for label, values in checked:
            signature[label] = values.detach()[records].reshape(len(records), -1)
            if not values.requires_grad or not calls:
                continue
            grads = torch.autograd.grad(values.sum(), [c.output for c in calls],
                                        retain_graph=True, allow_unused=True)
            for c_idx, g in enumerate(grads):
                if g is not None:
                    reached.add(c_idx)
                    signature[f"{label}: backprop at layer {c_idx}"] = _rows(g, n, records)
        # Only those calls: a layer that only a batch-wise term runs (a discriminator on
        # permuted codes) mixes records legitimately and adds nothing to a record's gradient.
        signature["#calls"] = [(i, type(calls[i].module).__name__, tuple(calls[i].output.shape))
                               for i in sorted(reached)]
        for c_idx in sorted(reached):
            for a_idx, a in enumerate(calls[c_idx].activations):
                signature[f"layer {c_idx} input {a_idx}"] = _rows(a, n, records)
            signature[f"layer {c_idx} output"] = _rows(calls[c_idx].output, n, records)
    signature["#records"] = records
    return signature


def _same_signature(a: dict, b: dict, keep: set[int] | None) -> bool | tuple[str, int]:
    """True if every probed record in ``keep`` (None: every probed record) has the same
    signature in ``a`` and ``b`` (bit for bit on CPU; relative 1e-6 of the row's scale on
    accelerators), else ``(what moved, which record)``."""
    if a.keys() != b.keys() or a.get("#calls") != b.get("#calls"):
        return ("the layer calls", min(keep) if keep else -1)
    records = a.get("#records", [])
    for key, x in a.items():
        if key.startswith("#") or x is None or b[key] is None:
            continue
        y = b[key]
        if x.shape != y.shape:
            return (key, records[0] if records else -1)
        for r, record in enumerate(records):
            if keep is not None and record not in keep:
                continue
            u, v = x[r], y[r]
            if u.device.type == "cpu":
                same = bool(((u == v) | (torch.isnan(u) & torch.isnan(v))).all())
            else:
                scale = torch.maximum(u.abs().max(), v.abs().max()).item()
                same = bool(((u - v).abs() <= 1e-6 * scale).all())
            if not same:
                label = key.split(":")[0] if not key.startswith("layer") else key
                return (label, record)
    return True


def _module_state(module: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter and buffer (by value: writes through ``.data`` bump no
    version counter)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name: t.detach().clone() for name, t in named}


def _refuse_state_changes(module: nn.Module, before: dict[str, Tensor]) -> None:
    after = dict(list(module.named_parameters()) + list(module.named_buffers()))
    changed = sorted(
        k for k in set(before) | set(after)
        if k not in before or k not in after or before[k].shape != after[k].shape
        or not bool(((before[k] == after[k].detach())
                     | (torch.isnan(before[k]) & torch.isnan(after[k].detach()))).all()))
    if changed:
        with torch.no_grad():  # put the state back: nothing of the batch stays in the module
            for k in changed:
                if k in before and k in after and before[k].shape == after[k].shape:
                    after[k].copy_(before[k])
        raise AttributionError(
            f"loss_terms() changed {changed} in place (or replaced them): a parameter or buffer "
            "written from the batch during the forward (a running statistic of the data, "
            "Embedding(max_norm=...)'s renormalisation) is released without noise. Keep "
            "loss_terms free of side effects on the module's state."
        )
