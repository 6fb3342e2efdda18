"""The analysis tool (``lb-analyze``): load experiments A-1..A-4 against a balancer, the offline
balance report of the lookup strategies, and why the specification's hash map is lopsided."""
