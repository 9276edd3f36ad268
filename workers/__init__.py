"""shapfleet workers: the pure explanation engine (``workers.engine``) and the Celery tasks around it.

Importing this package connects to nothing.
"""
