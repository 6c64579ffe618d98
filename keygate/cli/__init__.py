"""The custodians' admin CLI (Typer + Rich).  It calls the same service layer as the API."""
