"""`python train.py [overrides]`: see src/q2l/train.py."""

from q2l.train import main

if __name__ == "__main__":
    main()
