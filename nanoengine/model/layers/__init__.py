"""Building blocks of a decoder: linear layers, norms, rotary embedding, vocabulary layers."""
