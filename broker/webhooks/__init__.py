"""Grant events delivered to webhook receivers (docs/webhooks.md).

``broker.store`` appends each event to a Redis stream in the same step as the grant change
that caused it; here every replica reads that stream through one consumer group per receiver
(``stream``), signs (``signing``) and delivers (``delivery``) with retries for 24 hours.
"""
