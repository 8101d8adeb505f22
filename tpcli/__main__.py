from tpcli.cli import main

main()
