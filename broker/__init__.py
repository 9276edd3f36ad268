"""What the API and the workers share: settings, the Celery app, job records, the object store."""
