from bulkmail.cli import main

main()
