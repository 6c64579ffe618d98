"""keygate: government-held keys, envelope encryption and audit for Japan's Government Cloud."""

__version__ = "0.1.0"
