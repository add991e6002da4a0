from broker.devprovider import main

main()
