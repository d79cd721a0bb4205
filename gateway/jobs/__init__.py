"""The domain: the job state machine and the rules every job follows (payloads, records, the
owner's notifications, matching). Pure code: nothing of the store, the web or delivery."""
