from opulon.cli import main

main()
