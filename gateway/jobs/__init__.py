"""Jobs: the state machine and the rules every job follows, independent of HTTP."""
