# Study 3 (capacity factor, E = 8): fraction of routed tokens dropped during training.
# usage: gnuplot -e "dir='FIGURES'" plot_study3.gp
set terminal pngcairo size 900,560 font ",11"
set termoption noenhanced
set datafile missing "nan"
set grid
set xlabel "iteration"
set ylabel "fraction of tokens dropped (mean over the window and seeds)"
file = dir."/study3_dropped.dat"
stats file skip 1 nooutput
ncol = STATS_columns
set output dir."/study3_dropped.png"
set title "Switch E = 8: dropped tokens by training capacity factor"
set key top right title "capacity factor"
plot for [i=2:ncol] file using 1:i with linespoints lw 2 pt 7 ps 0.6 title columnheader(i)
