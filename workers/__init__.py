"""shapfleet workers: the pure explanation engine (``shapfleet.workers.engine``) and the Celery tasks around it.

Importing this package connects to nothing.
"""
