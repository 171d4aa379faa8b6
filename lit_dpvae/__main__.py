from lit_dpvae.entry import main

main()
