"""The core library: adapters on any ``nn.Module`` (``adapters``), where they live (``state``), how
they compose (``composition``), architectures as data (``arch``, ``backbone``), one file per method
(``methods``), peer formats (``formats``), saving and loading (``io``), fusion and merging.

Depends on nothing in adapterkit but ``errors`` and ``files``; the public names are re-exported by
``adapterkit`` itself (``ak.add_adapter``, ...).
"""
