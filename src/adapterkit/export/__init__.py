"""Export adapted models to the runtimes people run on devices: llama.cpp (GGUF) and ONNX Runtime.

One frozen base is converted once; each task is a small adapter file beside it (GGUF LoRA adapters),
or the adapter's modules are part of an exported graph (ONNX). ``adapterkit export`` is the command.
"""
