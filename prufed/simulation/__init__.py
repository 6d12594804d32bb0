"""`prufed simulate`: a real aggregator and real edge agents as processes on loopback, and their report."""
