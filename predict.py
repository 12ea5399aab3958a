"""`python predict.py ckpt=PATH input=DIR|GLOB|LIST.txt output=FILE`: see src/q2l/cli/predict.py."""

from q2l.cli.predict import main

if __name__ == "__main__":
    main()
