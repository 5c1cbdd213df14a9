"""Data: MTIL data sets, the decoded-image cache, synthetic folders, the toy world."""
