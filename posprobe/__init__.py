"""posprobe: mechanistic interpretability of positional behaviour in transformer language models."""
