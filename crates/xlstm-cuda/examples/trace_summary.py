"""Summarises `cuda_profile --trace FILE` (three batch-1 decode steps of the 7B shape): per kernel of a
layer, the gap after the previous kernel, the prologue, the time from the wait to the last block, and
the rate over its weights. Usage: python3 trace_summary.py FILE"""
import csv, sys, statistics as st, collections
rows=[tuple(int(x) for x in r.values()) for r in csv.DictReader(open(sys.argv[1]))]
rows.sort(key=lambda r:(r[5]))
launches=[]; cur=None
for r in rows:
    key=('gemv' if r[0]==1 else 'cell', r[1])
    if cur is None or cur['key']!=key or len(cur['r'])>=r[1]:
        cur={'key':key,'r':[]}; launches.append(cur)
    cur['r'].append(r)
per=len(launches)//3; L=launches[per:2*per]
names=[]; prev=None
for l in L:
    k,g=l['key']
    n = 'cell' if k=='cell' else {260:'qkvo',228:'gateup',256:('out' if prev=='cell' else 'down')}.get(g,'gemv%d'%g)
    names.append(n); prev=n
MB={'qkvo':100.7,'out':33.6,'gateup':179.3,'down':89.7,'cell':8.4}
agg=collections.defaultdict(list); prev_end=None
for n,l in zip(names,L):
    rs=l['r']; t1=min(r[5] for r in rs); pro=st.median(r[6]-r[5] for r in rs)
    e=sorted(r[7] for r in rs); e50=e[len(e)//2]; end=e[-1]
    gap=(t1-prev_end)/1e3 if prev_end else float('nan'); prev_end=end
    agg[n].append((gap,pro/1e3,(e50-t1)/1e3,(end-e50)/1e3,(end-t1)/1e3))
print("kernel n | gap prologue first_wait->end50 end50->end100 first_wait->end | GB/s over (end - first_wait - prologue)")
tot=0
for n in ['qkvo','cell','out','gateup','down']+[k for k in agg if k not in ('qkvo','cell','out','gateup','down')]:
    v=agg[n]; 
    if not v: continue
    m=[st.mean(x[i] for x in v if x[i]==x[i]) for i in range(5)]
    tot+=m[0]+m[4] if n in MB else 0
    bw=MB.get(n,0)*1e3/(m[4]-m[1]) if n in MB else 0
    print("%-7s %3d | %5.2f %5.2f %6.2f %5.2f %6.2f | %5.0f"%(n,len(v),*m,bw))
print("per layer (gap+dur) %.1f us"%tot)
