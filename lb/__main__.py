from lb.stack import main

main()
