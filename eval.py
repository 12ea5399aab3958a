"""`python eval.py ckpt=PATH [overrides]`: see src/q2l/evaluate.py."""

from q2l.evaluate import main

if __name__ == "__main__":
    main()
