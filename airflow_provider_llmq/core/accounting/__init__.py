"""What came back and what it cost: results, cost, the budget, progress."""
