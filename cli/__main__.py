"""``python -m trajectory.cli`` runs the ``sgdwalk`` command line."""
from trajectory.cli.main import main

if __name__ == "__main__":
    main(prog_name="sgdwalk")
