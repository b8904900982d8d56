"""bitbybit's vLLM plugin (entry point ``vllm.general_plugins: bitbybit``)."""


def register() -> None:
    """Register the ``bitbybit`` quantization method with vLLM (implemented in the vLLM plugin issue)."""
