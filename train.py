"""`python train.py [overrides]`: see src/q2l/cli/train.py."""

from q2l.cli.train import main

if __name__ == "__main__":
    main()
