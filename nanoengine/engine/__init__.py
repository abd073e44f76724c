"""The lifetime of a request: tokenize, run the decode loop, detokenize, stop."""
