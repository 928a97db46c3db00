"""``python -m vramplan`` (and ``torchrun -m vramplan``) run the CLI."""

from vramplan.cli import main

if __name__ == "__main__":
    main()
