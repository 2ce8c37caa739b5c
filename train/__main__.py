"""`python -m train`: train SiT or DiT, with or without REPA. See `python -m train --help`."""
from train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
