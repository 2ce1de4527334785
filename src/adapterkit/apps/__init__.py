"""Applications built on the library: the ``adapterkit`` command line (``cli``), the demos (``demo``,
``multitask``, ``speech_demo``), their data (``data``: VADER corpora from PyPI; ``speech_data``:
synthesised speech) and converters (``ct2whisper``). Nothing in the library imports them."""
