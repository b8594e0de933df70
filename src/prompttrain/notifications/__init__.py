"""Slack notifications: turn summaries and error notices, sent in the background, never on the request path.

slack.py     pure formatting of the Slack incoming-webhook payloads (the reference's format, §7)
observer.py  the writer observer that decides what to notify and where (a train's webhook, else the global one)
sender.py    the bounded queue, rate limit and timeout between the observer and Slack
"""
