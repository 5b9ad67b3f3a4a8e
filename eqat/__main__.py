from eqat.cli import main

main()
