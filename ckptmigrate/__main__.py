from ckptmigrate.cli import main

main(prog_name="ckptmigrate")
