"""What a request says: its body and options, structured output, and how an answer or a failure is read
(the error codes)."""
