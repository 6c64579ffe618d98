"""keygate's pure core: envelope format, AEAD, context encoding, errors.  No I/O."""
