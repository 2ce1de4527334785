"""``adapterkit serve``'s defaults, stated once: the engine, the launch options, the request limits, the
adapter bounds and the CLI's flags all read them from here.

No imports: the CLI reads these to print its help without loading the serving stack.
"""

HOST, PORT = "127.0.0.1", 8000
MAX_BATCH = 16  # sequences decoded together: every decode step has this many rows
MAX_QUEUE = 256  # requests waiting for a slot; past it 429
MAX_CONTEXT = 2048  # prompt + completion tokens of one sequence
PREFILL_CHUNK = 64  # prompt positions per prefill forward (benchmarks/serve_load.py: long-prompt ITL)
MAX_TOKENS = 1024  # the largest max_tokens (max_completion_tokens) a request may ask; above it 400
MAX_PROMPT_TOKENS = 2048  # a prompt (after the chat template) longer than this: 400
REQUEST_TIMEOUT = 600.0  # seconds from arrival to the last token; then the generation is cancelled
MAX_ADAPTERS = 32  # adapters kept loaded while idle
MAX_ADAPTER_BYTES = 2**30  # adapter weights kept loaded while idle; also the largest hub download
