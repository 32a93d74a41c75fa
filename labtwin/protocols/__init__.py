"""The protocol language, the library of protocol files, and the Prefect flows that run them."""
