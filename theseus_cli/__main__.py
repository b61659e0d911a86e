from theseus_cli.cli import main

main()
