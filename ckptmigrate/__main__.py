from ckptmigrate.cli import main

main()
