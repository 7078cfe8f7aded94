import os

# torch's TestCase appends "To execute this test, run ..." to every failure message (and to
# a KeyError's key): the message is the assertion's own here.
os.environ.setdefault("PYTORCH_PRINT_REPRO_ON_FAILURE", "0")
