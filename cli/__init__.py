"""The ``gift-fast`` command line (installed as ``gift_fast.cli``)."""
