"""shapfleet API: the HTTP service, the Python client and the ``shapfleet`` command line."""
