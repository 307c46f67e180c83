"""omnivox: an open, streaming runtime for Thinker-Talker omni models (Qwen2.5-Omni).

    import omnivox
    omni = omnivox.load("/path/to/Qwen2.5-Omni-3B", audio=False)
    for event in omnivox.generate(omni, omnivox.user_messages("Hello!"), omnivox.GenerationOptions()):
        ...
"""

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None, audio=True):
    """Load a checkpoint directory or hub id; see omnivox.model.load."""
    from omnivox.model import load as _load

    return _load(path, device=device, dtype=dtype, audio=audio)


def __getattr__(name):
    # the streaming API, imported on first use so `import omnivox` stays cheap
    if name in ("generate", "run", "GenerationOptions", "TextDelta", "Done", "user_messages"):
        from omnivox.streaming import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
