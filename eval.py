"""`python eval.py ckpt=PATH [overrides]`: see src/q2l/cli/evaluate.py."""

from q2l.cli.evaluate import main

if __name__ == "__main__":
    main()
