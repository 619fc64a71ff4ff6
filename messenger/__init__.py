"""Everything that speaks Messenger: verification, signatures, events, Graph API."""
