"""The demo: an embedded handwriting data set and a backbone pretrained on it, built on first use.

Nothing here is used unless a config selects it (`experiment=demo`, `make train`). Every folder it
writes is created and marked by `q2l.demo.owned`, and it refuses to write anywhere else.
"""
