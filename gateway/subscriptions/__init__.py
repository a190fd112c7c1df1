"""Subscriptions (issue 12): webhooks and pull-wake over Redis, shared by every replica."""
