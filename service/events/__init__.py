"""The live event feed (SSE hub) and webhooks."""
