from kvconvert.cli import main

main()
