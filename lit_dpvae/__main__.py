from lit_dpvae.cli import main

main()
